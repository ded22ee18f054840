package main

import (
	"fmt"
	"os"
)

// STUB: replaced by its owner.
func cmdBench(args []string) int {
	fmt.Fprintln(os.Stderr, "shoal bench: not implemented yet")
	return 1
}
