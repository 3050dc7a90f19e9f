"""Money and quotas: prices per model, the cost of a request, budgets per account and key."""
