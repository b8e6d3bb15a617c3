"""Scheduling: leases ready deliveries to senders and applies what they report."""
