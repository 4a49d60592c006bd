// Command phaul checkpoints, restores and live-migrates running Linux
// processes. See `phaul help`.
package main

import (
	"os"

	"github.com/phaul/phaul/internal/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:])) }
