"""The wire protocol client: framing, socket discovery, typed requests and reply layouts
(docs/protocol.md)."""
