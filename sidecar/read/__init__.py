"""The read side: the projection served to dashboards and people (DESIGN.md, "Read paths").

It shares the key layout (`sidecar.keys`) with the writers and imports none of the
workers: `projection` reads and decodes, `changes` tails the changes feed, `app` serves
them over HTTP with the board, `render` formats them for the terminal.
"""
