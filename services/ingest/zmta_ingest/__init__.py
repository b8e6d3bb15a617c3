"""SMTP intake: feeder interfaces that stream messages into the queue."""
