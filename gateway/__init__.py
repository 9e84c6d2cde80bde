"""Chat gateway."""

from gateway import compiled as _compiled

# the hot path's sources instead of their compiled build when asked to
# (GATEWAY_COMPILED=0) or when the build is stale (gateway.compiled)
_compiled.install_source_only()
