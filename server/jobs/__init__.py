"""Async jobs: durable submit / poll / watch, stores, scheduling and signed webhooks."""
