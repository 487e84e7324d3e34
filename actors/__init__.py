"""Ray actors and callable classes: anything stateful that Ray schedules."""
