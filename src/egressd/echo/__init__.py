"""The echo origin: tells a client the address and location it appears to come from."""
