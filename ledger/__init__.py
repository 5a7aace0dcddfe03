"""The spend ledger: `extauthz ledger` copies every charge and key change that the Redis
scripts append to the `ledger:{<tag>}` streams into PostgreSQL, exactly once
(docs/design.md section 12). The server never imports this package."""
