"""Wide-area DNS-SD: eucareg's announcements published in, and browsed from, the site's own DNS
server with TSIG-signed dynamic updates (RFC 2136, RFC 6763), beside mDNS (docs/dnssd.md).

Nothing here is imported unless the configuration has a `[dnssd]` table: dnspython loads only
on the hosts that use it (eucareg/agent/host.py chooses the backend).
"""
