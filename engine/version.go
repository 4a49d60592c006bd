package engine

// Version is recorded in every image; the CLI overrides it at link time.
var Version = "0.1.0-dev"
