"""Images, stacks, videos and slides; ``files`` (suffixes, hashes) imports no codec."""
