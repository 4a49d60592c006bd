package cli

// Version is phaul's version, set at build time with
// -ldflags "-X github.com/phaul/phaul/internal/cli.Version=...".
var Version = "0.1.0-dev"
