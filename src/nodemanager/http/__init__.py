"""The project's one HTTP/1.1 stack: pure framing (:mod:`.framing`), an asyncio server core
(:mod:`.server`, its connections in :mod:`.connection`), a blocking client (:mod:`.client`), an
asyncio client (:mod:`.aclient`) and the hardened XML-RPC codec (:mod:`.xmlrpc`). Importing the
package imports none of them (``forward_api_calls`` imports only the framing)."""
