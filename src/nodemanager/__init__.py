"""nodemanager: a per-node daemon that turns an authority's sliver list into real Linux accounts."""

__version__ = "0.1.0"
