"""End-to-end tests of the PoP data plane: real clients (curl, python-socks, aioquic) and
real sockets, on loopback addresses only (127.0.0.0/8 and ::1)."""
