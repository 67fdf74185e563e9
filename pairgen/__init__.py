"""pairgen."""
