"""The bundled authority ("PLC"): a second program that ships with the node manager.

It reads slices, nodes and keys from a declarative TOML file (:mod:`.model`), serves each node its
``GetSlivers`` struct and ``slices.xml`` over HTTP with blocking queries (:mod:`.server`,
:mod:`.waits`), and issues signed tickets (:mod:`.issue`, :mod:`.signing`, :mod:`.pgpsigning`).

Layering: this package may use the protocol modules both sides share
(``nodemanager.authority.{auth,parse,safe_xml}``), ``nodemanager.core`` and the HTTP stack; the
node's side never imports it (only the CLI, the demo and ``nodemanager.testing`` do).
"""
