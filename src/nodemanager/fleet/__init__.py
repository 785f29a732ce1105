"""``nodemanager fleet simulate``: hollow node managers against one authority (docs/fleet.md).

:mod:`.simulator` runs the nodes on one asyncio loop, :mod:`.node` is one hollow node (the
daemon's own Syncer, store and hollow backend), :mod:`.wire` its requests, :mod:`.cli` the options.
"""
