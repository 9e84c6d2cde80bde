"""Sans-IO visitor protocol: codes, frame codec, tokens and session state.

The submodules are imported explicitly (``from gateway.protocol.codec import
decode_frame``); this package module deliberately imports nothing so that the
pieces stay independent.
"""
