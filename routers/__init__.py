"""One router per file, thin: parse the request, call a service, translate its result."""
