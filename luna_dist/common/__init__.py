"""What every layer shares: atomic writes, the commands' conventions, device facts, the peers of a distributed
run, safe file names. Nothing here is public."""
