"""The device agent (`egressd client`, `egressd verify`): enrollment state, PoP selection
over device links (`attach`), the local SOCKS5/HTTP proxy and PAC file (`local_proxy`),
and the egress check of R12 (`verify`)."""
