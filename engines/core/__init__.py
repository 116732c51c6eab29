"""The engine core (scheduler + block manager + runner) and what feeds and drains it."""
