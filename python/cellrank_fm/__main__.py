from cellrank_fm.cli import main

main()
