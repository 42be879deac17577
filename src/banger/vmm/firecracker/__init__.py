"""The Firecracker backend.

`api` is the HTTP client for one Firecracker process, `config` turns a VM description into the API calls
that configure it, and `jailer` plans the jail (paths, argv, files to stage) for the root helper.
"""
