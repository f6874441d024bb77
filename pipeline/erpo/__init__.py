"""ERPO: the temperature rule (`rule`), the per-prompt history table it runs on (`store`), its
snapshots (`snapshots`), and the table partitioned like the topic it is built from, for several
reward workers (`partitions`)."""
