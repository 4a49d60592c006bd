package bench

import (
	"fmt"
	"strings"
	"time"
)

// Variant is one configuration under comparison: how phaul (or CRIU)
// migrates, and what the workload's pages hold.
type Variant struct {
	// Name is the label in the report: "phaul" when nothing is compared,
	// else the compared settings, e.g. "track=hash compress=zstd".
	Name string `json:"name"`
	// Engine is "phaul", "criu" (stop-and-copy) or "criu-lazy" (post-copy).
	Engine string `json:"engine"`
	// Track is the dirty-page tracker ("": phaul's choice).
	Track string `json:"track,omitempty"`
	// Compress is the page codec ("": phaul's default).
	Compress string `json:"compress,omitempty"`
	// Downtime is the stop rule's budget (0: phaul's default).
	Downtime time.Duration `json:"downtime_budget_ns,omitempty"`
	// Random makes the workload's pages incompressible.
	Random bool `json:"random_data,omitempty"`
}

// CompareHelp documents the --compare syntax.
const CompareHelp = `compare configurations, interleaved: KEY=V1,V2,... (repeat the flag to cross dimensions):
  track=auto,uffdwp,softdirty,hash   dirty-page tracker
  compress=s2,zstd,none              page compression
  downtime=25ms,100ms                stop-rule downtime budget
  data=heap,random                   workload pages: compressible or random
  engine=phaul,criu,criu-lazy        CRIU 4.x stop-and-copy / lazy-pages (skipped with a note when unavailable)`

var compareKeys = map[string][]string{
	"track":    {"auto", "uffdwp", "softdirty", "hash"},
	"compress": {"s2", "zstd", "none"},
	"data":     {"heap", "random"},
	"engine":   {"phaul", "criu", "criu-lazy"},
	"downtime": nil, // any duration
}

// ParseCompare turns --compare values into the variants to run: the cross
// product of every dimension, starting from base. Without specs it returns
// base alone, named "phaul".
func ParseCompare(specs []string, base Variant) ([]Variant, error) {
	if base.Engine == "" {
		base.Engine = "phaul"
	}
	base.Name = "phaul"
	out := []Variant{base}
	seen := map[string]bool{}
	for _, spec := range specs {
		key, list, ok := strings.Cut(spec, "=")
		key = strings.TrimSpace(key)
		allowed, known := compareKeys[key]
		if !ok || !known {
			return nil, fmt.Errorf("--compare %q: want KEY=V1,V2 with KEY one of track, compress, downtime, data, engine", spec)
		}
		if seen[key] {
			return nil, fmt.Errorf("--compare %s given twice", key)
		}
		seen[key] = true
		var vals []string
		for _, v := range strings.Split(list, ",") {
			if v = strings.TrimSpace(v); v != "" {
				vals = append(vals, v)
			}
		}
		if len(vals) == 0 {
			return nil, fmt.Errorf("--compare %q: no values", spec)
		}
		var next []Variant
		for _, v := range out {
			for _, val := range vals {
				nv := v
				if err := setKey(&nv, key, val, allowed); err != nil {
					return nil, err
				}
				if len(seen) == 1 {
					nv.Name = key + "=" + val
				} else {
					nv.Name = v.Name + " " + key + "=" + val
				}
				next = append(next, nv)
			}
		}
		out = next
	}
	return out, nil
}

func setKey(v *Variant, key, val string, allowed []string) error {
	if allowed != nil && !contains(allowed, val) {
		return fmt.Errorf("--compare %s=%s: %s takes %s", key, val, key, strings.Join(allowed, ", "))
	}
	switch key {
	case "track":
		v.Track = val
		if val == "auto" {
			v.Track = ""
		}
	case "compress":
		v.Compress = val
	case "data":
		v.Random = val == "random"
	case "engine":
		v.Engine = val
	case "downtime":
		d, err := time.ParseDuration(val)
		if err != nil || d <= 0 {
			return fmt.Errorf("--compare downtime=%s: not a positive duration (e.g. 25ms)", val)
		}
		v.Downtime = d
	}
	return nil
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}
