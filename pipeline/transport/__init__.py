"""Messages between the services, as Arrow over Kafka: the run's topics (`topics`), the `producer`,
the `consumer` with its `deadletters` (signed with `signature`) and poll `watchdog`, their
`metrics`, and the `clients` they run on: kafka-python's, or the in-memory broker's (`memory`) for
the fast test tier."""
