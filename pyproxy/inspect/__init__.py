"""Seeing what pyproxy is doing: the debug API (`server`), its pure views (`views`,
`tables`), the read-only reader of a running proxy (`reader`) and `pyproxy inspect` (`cli`).

Rooms: `reader` reads the model and the relays' read-only pictures; `views` turns them
into sorted, filtered, paged JSON rows; `server` is the HTTP edge on the metrics address
(and the per-worker sockets); `cli` does one HTTP GET and prints a table with `tables`.
"""
