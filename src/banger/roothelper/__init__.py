"""bangerd-root: the narrow privileged helper.

The owner daemon never has root. Everything that needs it (bridge and taps, NAT, signalling VMMs,
Firecracker's jail: staging, the jailer's launch, cleanup) goes through this helper's fixed allowlist of
`priv.*` methods, each of which checks every argument in `validate` before touching the system.
`client.HelperClient` is the daemon's side of the seam.
"""
