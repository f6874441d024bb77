"""The trajectory lake: every topic recorded as Parquet (`store`) and the queries behind
`rlstream report` (`report`)."""
