"""The control plane: store, REST API, snapshot distribution and geofeed (DESIGN §3)."""
