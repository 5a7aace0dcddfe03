"""The virtual-key domain: key format, records, limits, pricing and the Redis store.

Imports nothing from `extauthz` or grpc; the servers map it to the wire.
"""
