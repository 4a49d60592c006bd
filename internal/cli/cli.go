package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/spf13/pflag"
)

// command is one phaul subcommand.
type command struct {
	name    string
	summary string // one line for `phaul help`
	usage   string // synopsis, e.g. "-t PID -D DIR [flags]"
	hidden  bool   // internal: not listed by `phaul help`
	// run parses args with fs (already holding the command's flags via
	// flags) and does the work.
	flags func(fs *pflag.FlagSet) func(ctx context.Context, env *Env, args []string) error
}

// Env is what a subcommand may touch besides its flags.
type Env struct {
	Stdin  *os.File
	Stdout io.Writer
	Stderr io.Writer
}

var commands = map[string]*command{}

func register(c *command) { commands[c.name] = c }

// errUsage marks an error in the command line itself (exit status 2).
var errUsage = errors.New("usage")

// usageError reports a command line mistake.
func usageError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

// Main runs phaul with args (without the program name) and returns the exit
// status.
func Main(args []string) int {
	env := &Env{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}
	return run(args, env)
}

func run(args []string, env *Env) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		if len(args) > 1 {
			if c, ok := commands[args[1]]; ok {
				fs := newFlagSet(c)
				c.flags(fs)
				printCommandHelp(env.Stdout, c, fs)
				return 0
			}
		}
		printHelp(env.Stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "version" || args[0] == "--version" {
		fmt.Fprintf(env.Stdout, "phaul %s\n", Version)
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(env.Stderr, "phaul: unknown command %q (see `phaul help`)\n", args[0])
		return 2
	}
	fs := newFlagSet(c)
	runFn := c.flags(fs)
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			printCommandHelp(env.Stdout, c, fs)
			return 0
		}
		fmt.Fprintf(env.Stderr, "phaul %s: %v\n", c.name, err)
		fmt.Fprintf(env.Stderr, "usage: phaul %s %s\n", c.name, c.usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := runFn(ctx, env, fs.Args()); err != nil {
		fmt.Fprintf(env.Stderr, "phaul %s: %v\n", c.name, err)
		if errors.Is(err, errUsage) {
			fmt.Fprintf(env.Stderr, "usage: phaul %s %s\n", c.name, c.usage)
			return 2
		}
		var ee exitError
		if errors.As(err, &ee) {
			return int(ee)
		}
		return 1
	}
	return 0
}

// exitError carries an exit status to return without a message of our own
// (for instance the status of a restored process).
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func newFlagSet(c *command) *pflag.FlagSet {
	fs := pflag.NewFlagSet("phaul "+c.name, pflag.ContinueOnError)
	fs.SortFlags = false
	fs.SetOutput(io.Discard)
	return fs
}

func printHelp(w io.Writer) {
	fmt.Fprint(w, `phaul: live migration of running Linux processes

Usage: phaul COMMAND [flags]

Commands:
`)
	names := make([]string, 0, len(commands))
	for n, c := range commands {
		if !c.hidden {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprint(w, "\nRun `phaul help COMMAND` or `phaul COMMAND --help` for a command's flags.\n")
}

func printCommandHelp(w io.Writer, c *command, fs *pflag.FlagSet) {
	fmt.Fprintf(w, "Usage: phaul %s %s\n\n%s\n", c.name, c.usage, c.summary)
	if u := fs.FlagUsages(); strings.TrimSpace(u) != "" {
		fmt.Fprintf(w, "\nFlags:\n%s", u)
	}
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
