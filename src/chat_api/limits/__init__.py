"""Rate limits and budgets: in this process, or shared by every replica through Redis."""
