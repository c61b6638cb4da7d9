"""Thin edges around confluent-kafka: the source consumer, the dead-letter producer, topic admin."""
