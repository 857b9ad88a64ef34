"""The management API: HTTP/1.1 with JSON bodies on a Unix socket (`curl --unix-socket`).

http.py: the request parser (strict limits, typed errors) and responses; routes.py: what each
endpoint does with the Machine; describe.py: the Machine as JSON (GET /vm, GET /vm/counters);
server.py: the listening socket and its thread; client.py: the other end, for `pyvmm ls/info/...`."""
