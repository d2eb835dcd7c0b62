"""Per-tunnel listeners: where a packet's tunnel becomes a Subscriber."""
