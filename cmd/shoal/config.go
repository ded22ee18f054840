package main

import (
	"fmt"
	"os"

	"github.com/shoalhq/shoal/configs"
)

// cmdConfig: `shoal config check FILE` prints every mistake with its line.
func cmdConfig(args []string) int {
	if len(args) != 2 || args[0] != "check" {
		fmt.Fprintln(os.Stderr, "usage: shoal config check FILE")
		return 2
	}
	if _, err := configs.LoadFile(args[1]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("%s: ok\n", args[1])
	return 0
}
