"""Services: drive the sans-I/O participants (in-process today, over MQTT next)."""
