"""The pure core: decoding, identifiers, membership, mappings, batching, the ledger, retry policy, answers and
dead-letter headers. No I/O; time comes from an injected clock."""
