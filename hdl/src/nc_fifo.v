// Small synchronous FIFO with a registered `space` flag, so a producer's enable never depends
// combinationally on the consumer's ready (it breaks the ready path between the two streams).
`default_nettype none
module nc_fifo #(
    parameter WIDTH = 17,
    parameter DEPTH = 2
) (
    input  wire             clk,
    input  wire             rst,
    input  wire             push,        // only when space
    input  wire [WIDTH-1:0] din,
    output wire             space,
    output wire             valid,
    output wire [WIDTH-1:0] dout,
    input  wire             ready
);
    localparam AW = (DEPTH > 1) ? $clog2(DEPTH) : 1;
    reg [WIDTH-1:0] mem [0:DEPTH-1];
    reg [AW-1:0]    rd, wr;
    reg [AW:0]      count;
    wire pop = valid && ready;
    assign valid = (count != 0);
    assign space = (count < DEPTH);
    assign dout = mem[rd];
    always @(posedge clk) begin
        if (rst) begin
            rd <= 0; wr <= 0; count <= 0;
        end else begin
            if (push) begin
                mem[wr] <= din;
                wr <= (wr == DEPTH - 1) ? {AW{1'b0}} : wr + 1'b1;
            end
            if (pop) rd <= (rd == DEPTH - 1) ? {AW{1'b0}} : rd + 1'b1;
            count <= count + {{AW{1'b0}}, push} - {{AW{1'b0}}, pop};
        end
    end
endmodule
`default_nettype wire
