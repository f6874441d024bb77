"""ERPO: the per-prompt history table and its temperature rule (`history`), and the table
partitioned like the topic it is built from, for several reward workers (`partitions`)."""
