"""Messages between the services: the Kafka producer/consumer of Arrow messages (`kafka`) and
the in-memory broker behind the same interface for the fast test tier (`memory`)."""
