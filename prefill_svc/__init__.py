"""The prefill server: a gRPC service around an engine in producer role.

It computes a prompt's KV, samples the first token and returns it at once with the
``kv_transfer_params`` a decode instance needs to pull the blocks, which its connector holds
until the decode side confirms or they expire. Imports engine, kv_connector and protos; never
proxy or decode_svc.
"""
