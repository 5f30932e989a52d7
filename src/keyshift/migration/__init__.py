"""The migration engine: rules, a pure planner, and the executor that applies and rolls back."""
