"""The event bus: served feeds and client events, durable before acknowledged, and the sink
that compacts them into the impression logs exactly once."""
