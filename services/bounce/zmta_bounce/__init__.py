"""Bounce handling: classifies SMTP replies, acts on rejected deliveries."""
