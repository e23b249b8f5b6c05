"""Cache-affinity routing over workers, and a discrete-event replay of request traces."""
