"""The session core: protocol v1's rules as pure code (no Trio, no sockets, no storage).

``hub`` takes events and the time and returns actions; ``storage`` is the seam every
store implements. The shells (the Trio server, the mock server, tests) carry the
actions out.
"""
