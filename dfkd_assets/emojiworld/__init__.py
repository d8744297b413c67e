"""World 2: concept classes drawn from open emoji artwork (issue 35)."""
