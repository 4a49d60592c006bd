package cli

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/engine/image"
)

func init() {
	register(&command{
		name:    "show",
		summary: "decode a checkpoint directory or a single image file",
		usage:   "DIR|FILE [--json]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			asJSON := fs.Bool("json", false, "print JSON (messages in protojson form) instead of text")
			return func(ctx context.Context, env *Env, args []string) error {
				if len(args) != 1 {
					return usageError("want one DIR or FILE, got %d arguments", len(args))
				}
				opt := image.Options{JSON: *asJSON}
				st, err := os.Stat(args[0])
				if err != nil {
					return err
				}
				if !st.IsDir() {
					return image.DescribeFile(env.Stdout, args[0], opt)
				}
				cp, err := image.Load(args[0])
				if err != nil {
					return fmt.Errorf("%w (show a single file of the directory to see its content)", err)
				}
				return image.Describe(env.Stdout, cp, opt)
			}
		},
	})
}
